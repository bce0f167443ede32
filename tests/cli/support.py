"""In-process runs of the command line, shared by the CLI test modules."""

from __future__ import annotations

from typing import Any

from click import testing as click_testing

from mappingstore.cli import cli


class Run:
    """The outcome of one CLI invocation."""

    def __init__(self, code: int, stdout: str, stderr: str, stdout_bytes: bytes = b"") -> None:
        self.code = code
        self.stdout = stdout
        self.stderr = stderr
        self.stdout_bytes = stdout_bytes

    def __repr__(self) -> str:
        return f"Run(code={self.code}, stdout={self.stdout[:300]!r}, stderr={self.stderr!r})"


def invoke(*args: str, input: str | bytes | None = None, env: dict[str, str] | None = None) -> Run:
    result = click_testing.CliRunner().invoke(cli, list(args), input=input, env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a bug, not a handled error: show its traceback
    return Run(result.exit_code, result.stdout, result.stderr, result.stdout_bytes)


def ok(*args: str, **kwargs: Any) -> Run:
    run = invoke(*args, **kwargs)
    assert run.code == 0, run
    return run


def exact(a: Any, b: Any) -> bool:
    """Same type and same value, NaN included (repr is exact for every type stored)."""
    return type(a) is type(b) and repr(a) == repr(b)
