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
