"""python -m musubi_tuner.ui: the studio (see server.py)."""

from musubi_tuner.ui.server import main

main()
