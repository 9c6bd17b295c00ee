"""The ``fastlora`` command: ``fastlora demo`` and ``fastlora bench`` (thin dispatch)."""

from __future__ import annotations

import sys

COMMANDS = {
    "demo": ("fastlora.demo", "fine-tune a small Llama with LoRA on CPU, save, reload, check"),
    "bench": ("fastlora.bench", "benchmark fastlora against PEFT and the frozen base layer"),
}


def _usage() -> str:
    lines = ["usage: fastlora {demo,bench} [options]   |   fastlora --version", ""]
    lines += [f"  {name:<6} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "fastlora COMMAND --help shows the options of COMMAND"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from fastlora._version import __version__

        print(f"fastlora {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        kind = "option" if argv[0].startswith("-") else "command"
        print(f"fastlora: unknown {kind} {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
