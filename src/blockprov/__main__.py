"""The ``blockprov`` command's entry point (and ``python -m blockprov``).

Why not ``blockprov.cli:main`` directly: the command line's modules take a moment to import (more
on a loaded machine), and a Ctrl-C meanwhile escaped every handler as a traceback, or landed in
importlib's own callbacks ("Exception ignored …"). Here a Ctrl-C during that import is held until
it is done, then ends as the CLI's edge ends one: one line (a JSON object under --json), exit 130.
Only the interpreter's own start (its ``site`` import) comes before this module runs.
"""

import sys  # loaded already: nothing else (not even __future__) is imported before the guard

EXIT_INTERRUPTED = 130  # as cli/__init__.py's (tests/unit/test_exit_codes.py checks they agree)


def main() -> None:
    held: list[int] = []
    try:
        import signal

        previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
        try:
            from blockprov.cli import main as cli
        finally:
            signal.signal(signal.SIGINT, previous)
    except KeyboardInterrupt:  # before the handler was in place
        held.append(2)
    if held:
        if "--json" in sys.argv[1:]:  # the edge's JSON error, written by hand: json may not be imported
            sys.stderr.write(f'{{"details": {{}}, "error": "Interrupted", "exit_code": {EXIT_INTERRUPTED}, '
                             '"message": "interrupted"}\n')
        else:
            sys.stderr.write("blockprov: interrupted\n")
        raise SystemExit(EXIT_INTERRUPTED)
    cli()


if __name__ == "__main__":
    main()
