"""`python -m sd35dist.demo` (what `make demo` runs)."""

from sd35dist.demo.program import main

if __name__ == "__main__":
    raise SystemExit(main())
