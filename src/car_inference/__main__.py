"""`python -m car_inference` runs the CLI."""

from .cli import main

main()
