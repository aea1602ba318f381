"""nox sessions: ``nox -s tests``, ``nox -s lint``, ``nox -s bench``."""

from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint"]


@nox.session
def tests(session: nox.Session) -> None:
    session.install("-e", ".[test]")
    session.run("pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    paths = [p for p in ("nbfit", "tests", "bench") if Path(p).exists()]
    session.run("ruff", "check", *paths)


@nox.session
def bench(session: nox.Session) -> None:
    session.install(".")
    if Path("bench/run.py").exists():
        session.run("python", "bench/run.py", *session.posargs)
    else:
        session.skip("bench/run.py not found")
