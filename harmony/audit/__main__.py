"""``python -m harmony.audit``: see harmony.audit.run."""
from harmony.audit.run import main

if __name__ == "__main__":
    raise SystemExit(main())
