"""`python -m exl2build` is the `exl2build` command."""

from exl2build.cli import main

main()
