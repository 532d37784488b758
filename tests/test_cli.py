"""The CLI dispatcher: every sub-command registered, help, usage errors, negative option values, logging."""

import subprocess
import sys

from medldm.cli import COMMANDS, _join_negative_values, build_parser, main

ALL_COMMANDS = ["info", "convert", "degrade", "evaluate", "baseline", "plan", "train", "enhance", "synthesize", "audit",
                "models", "demo", "listen"]


def test_every_command_is_registered_and_has_help():
    parser, mods = build_parser()
    assert list(mods) == ALL_COMMANDS
    assert list(COMMANDS) == ALL_COMMANDS
    for name in mods:
        assert main([name, "--help"]) == 0, name


def test_a_broken_command_module_fails_instead_of_vanishing(monkeypatch):
    import pytest

    monkeypatch.setitem(COMMANDS, "enhance", ("medldm.cli.no_such_module", "broken"))
    with pytest.raises(ModuleNotFoundError):
        build_parser()


def test_log_messages_on_stderr_quiet_and_verbose(monkeypatch, capsys):
    """medldm's loggers print plain lines on stderr: INFO by default, WARNING with --quiet, DEBUG with --verbose."""
    import logging

    import medldm.cli.convert as convert
    import medldm.cli.models as models

    def talk(args):
        log = logging.getLogger("medldm.some.module")
        log.debug("debug line")
        log.info("info line")
        log.warning("warning line")
        return 0

    monkeypatch.setattr(models, "run", talk)
    monkeypatch.setattr(convert, "run", talk)
    assert main(["models"]) == 0
    assert capsys.readouterr().err == "info line\nwarning line\n"
    assert main(["--verbose", "models"]) == 0
    assert capsys.readouterr().err == "debug line\ninfo line\nwarning line\n"
    assert main(["convert", "in", "out", "--quiet"]) == 0
    assert capsys.readouterr().err == "warning line\n"
    # outside the CLI, medldm installs no handler: the logger is back as it was
    assert not logging.getLogger("medldm").handlers and logging.getLogger("medldm").propagate


def test_no_command_and_unknown_command_are_usage_errors():
    assert main([]) == 2
    assert main(["no-such-command"]) == 2


def test_negative_values_join_their_option():
    assert _join_negative_values(["evaluate", "--window", "-160,240", "-o", "x"]) == [
        "evaluate", "--window=-160,240", "-o", "x"]
    assert _join_negative_values(["degrade", "--level", "0.5"]) == ["degrade", "--level", "0.5"]
    # an option that follows an option is not swallowed
    assert _join_negative_values(["info", "--json", "--volume", "1"]) == ["info", "--json", "--volume", "1"]


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "medldm", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "medldm" in r.stdout


def test_cli_reference_documents_every_option():
    """docs/cli.md (tools/gen_cli_docs.py) lists every sub-command and each of its options."""
    import argparse
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    parser, mods = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sections = {s.split("`", 1)[0]: s for s in doc.split("## `medldm ")[1:]}
    for name in mods:
        assert name in sections, f"docs/cli.md lacks `medldm {name}`: run python tools/gen_cli_docs.py"
        for action in sub.choices[name]._actions:
            for opt in action.option_strings:
                assert opt in sections[name], f"docs/cli.md: `medldm {name}` lacks {opt}: run python tools/gen_cli_docs.py"


def test_errors_escaping_a_command_are_one_line(monkeypatch, capsys):
    """A CaseError or a MemoryError that reaches the entry point is one line, not a traceback."""
    import medldm.cli.models as models
    from medldm.io.errors import CaseError

    def case_error(args):
        raise CaseError("/m/config.yaml", "invalid model config:\nvae.channels", "copy it again")

    monkeypatch.setattr(models, "run", case_error)
    assert main(["models"]) == 2
    assert capsys.readouterr().err == "medldm models: error: /m/config.yaml: invalid model config: vae.channels — copy it again\n"

    def oom(args):
        raise MemoryError

    monkeypatch.setattr(models, "run", oom)
    assert main(["--verbose", "models"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("medldm models: error: out of memory") and err.count("\n") == 1
