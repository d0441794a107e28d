"""`python -m imitate ...` (and so `accelerate launch -m imitate train ...`)."""

from imitate.cli import main

if __name__ == "__main__":
    main()
