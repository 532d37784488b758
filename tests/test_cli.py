"""The CLI dispatcher: help, usage errors, negative option values."""

import subprocess
import sys

from medldm.cli import COMMANDS, _join_negative_values, build_parser, main


def test_every_registered_command_has_help():
    parser, mods = build_parser()
    assert {"info", "convert", "degrade", "evaluate", "baseline"} <= set(mods)
    for name in mods:
        assert main([name, "--help"]) == 0, name
    assert set(mods) <= set(COMMANDS)


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
