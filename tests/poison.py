"""A Ray worker setup hook for tests/test_integrity.py: a solver process dies, the way a
segfault or an OOM kill would end it, when it reads an image named poison/1.png; each
death first appends a line to poison/deaths, so that the test can count them."""
import os


def install() -> None:
    from solver_service import parts

    read_image = parts.read_image

    def read_or_die(uri: str):
        if uri.endswith(os.path.join("poison", "1.png")):
            with open(os.path.join(os.path.dirname(uri), "deaths"), "a") as f:
                f.write(f"{os.getpid()}\n")
            os._exit(1)
        return read_image(uri)

    parts.read_image = read_or_die
