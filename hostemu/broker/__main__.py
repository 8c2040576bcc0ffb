"""``python -m hostemu.broker``: run the broker process (same as ``vbusemu broker``)."""

from hostemu.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["broker", *__import__("sys").argv[1:]]))
