"""A Ray worker setup hook for tests/test_cluster.py: a solver process that reads an image
from a folder holding a file named `hold` appends its pid to `held` there and waits until
`hold` is gone, so that a test can act while every solver is mid-part, on any machine speed."""
import os
import time


def install() -> None:
    from solver_service import parts

    read_image = parts.read_image

    def read_when_released(uri: str):
        folder = os.path.dirname(uri)
        if os.path.exists(os.path.join(folder, "hold")):
            with open(os.path.join(folder, "held"), "a") as f:
                f.write(f"{os.getpid()}\n")
            while os.path.exists(os.path.join(folder, "hold")):
                time.sleep(0.05)
        return read_image(uri)

    parts.read_image = read_when_released
