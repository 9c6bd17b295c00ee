"""The ``fastlora`` command: ``fastlora demo`` and ``fastlora bench`` (thin dispatch)."""

from __future__ import annotations

import sys

COMMANDS = {
    "demo": ("fastlora.demo", "fine-tune a small Llama with LoRA on CPU, save, reload, check"),
    "bench": ("fastlora.bench", "benchmark fastlora against PEFT and the frozen base layer"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: fastlora {demo,bench} [options]\n")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<6} {text}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
