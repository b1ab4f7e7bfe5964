import sys

from octoproxy.controlplane.server import main

sys.exit(main(sys.argv[1:]))
