"""A Ray worker setup hook for tests/test_integrity.py: a solver process dies, the way a
segfault or an OOM kill would end it, when it reads an image named poison/1.png (each
death first appends a line to poison/deaths, so that the test can count them); and
reading an image under a folder `outage` fails with a storage error (an S3 503) while
a file `outage/FAILING` exists."""
import os


def install() -> None:
    from solver_service import parts

    read_image = parts.read_image

    def read_or_die(uri: str):
        if uri.endswith(os.path.join("poison", "1.png")):
            with open(os.path.join(os.path.dirname(uri), "deaths"), "a") as f:
                f.write(f"{os.getpid()}\n")
            os._exit(1)
        folder = os.path.dirname(uri)
        if os.path.basename(folder) == "outage" and os.path.exists(os.path.join(folder, "FAILING")):
            raise OSError(f"When reading information for key '{uri}': AWS Error SLOW_DOWN (HTTP status 503)")
        return read_image(uri)

    parts.read_image = read_or_die
