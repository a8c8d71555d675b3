import sys

from services.cli import main

sys.exit(main(["compressor", *sys.argv[1:]]))
