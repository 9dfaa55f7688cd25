from secretfs.cli import run

run()
