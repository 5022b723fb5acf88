"""``python -m metake_fast`` runs the ``metake-fast`` command line."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
