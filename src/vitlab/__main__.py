import sys

try:  # an interrupt while the command line itself imports is one line too; main() covers the rest
    from vitlab.cli import main
except KeyboardInterrupt:
    print("vitlab: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
