"""``python -m vidgen demo ...`` (also the ``vidgen`` console script)."""
import sys


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: vidgen demo [--steps N] [--vae-steps N] [--seed S] [--out DIR] [--device DEV] [--tiny]\n"
              "                   [--quiet] [--threads N] [--set KEY=VALUE ...]   (vidgen demo --help: details)")
        return 0
    if argv[0] == "demo":
        from .demo import main as demo_main
        return demo_main(argv[1:])
    print(f"vidgen: unknown command {argv[0]!r} (available: demo)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
