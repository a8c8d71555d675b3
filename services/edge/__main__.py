import sys

from services.cli import main

sys.exit(main(["edge", *sys.argv[1:]]))
