"""The root `meda` command: version, help, engine groups, demo options."""

from typer.testing import CliRunner

from meda import __version__
from meda.cli import app

runner = CliRunner()


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"meda {__version__}"


def test_help_names_both_engines_and_the_demo() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for word in ("kv", "ctr", "demo", "KV cache", "CTR"):
        assert word in result.output


def test_every_command_has_help() -> None:
    for args in (["kv"], ["kv", "run"], ["kv", "bench"], ["ctr"], ["ctr", "generate"], ["ctr", "train"], ["demo"]):
        result = runner.invoke(app, [*args, "--help"])
        assert result.exit_code == 0, args
        assert "Usage" in result.output


def test_demo_rejects_unknown_engine() -> None:
    result = runner.invoke(app, ["demo", "--engine", "both"])
    assert result.exit_code != 0
    assert "unknown engine" in result.output


def test_the_cli_imports_neither_torch_nor_transformers_until_a_command_runs() -> None:
    """`meda --help` and every group's --help stay quick (about 0.2 s, where torch and transformers take 3-5 s)."""
    import subprocess
    import sys

    code = "import sys, meda.cli, meda.kv; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
