import sys

from services.cli import main

sys.exit(main(["ingest", *sys.argv[1:]]))
