from upmig.cli import run

run()
