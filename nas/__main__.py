"""`python -m nas COMMAND ARGS…`: every console script without relying on installed scripts.

The dashboard starts its workers this way, with the interpreter it runs on.
"""

import sys

from nas import cli

COMMANDS = {"search": cli.search_main, "report": cli.report_main, "export": cli.export_main,
            "bench": cli.bench_main, "dashboard": cli.dashboard_main}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: python -m nas {{{','.join(COMMANDS)}}} [ARGS...]", file=sys.stderr)
        sys.exit(2)
    sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
