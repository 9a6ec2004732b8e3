"""After `setup_rpi.sh --system-site-packages`, in the venv (scripts/ci_fresh_pi.sh): apt's numpy
is the one imported, apt's C extensions built against it load (bottleneck here, in the place of
picamera2's simplejpeg, see packages.txt), and the OpenCV pip chose under that numpy works.
Prints one line; exit status 1 with the reason otherwise."""

import os
import subprocess
import sys


def main():
    system = subprocess.run(["/usr/bin/python3", "-I", "-c", "import numpy; print(numpy.__version__); print(numpy.__file__)"],
                            capture_output=True, text=True, check=True).stdout.split("\n")
    import numpy

    if (numpy.__version__, os.path.realpath(numpy.__file__)) != (system[0], os.path.realpath(system[1])):
        sys.exit(f"the venv imports numpy {numpy.__version__} from {numpy.__file__}, "
                 f"not the system's {system[0]} from {system[1]}")
    import bottleneck

    data = numpy.array([1.5, numpy.nan, 2.0, -4.0])
    if bottleneck.nansum(data) != -0.5 or bottleneck.nanmax(data) != 2.0:
        sys.exit("apt's bottleneck computes wrong sums with this numpy")
    import cv2

    rng = numpy.random.default_rng(0)
    image = rng.integers(0, 256, (31, 17, 3), dtype=numpy.uint8)
    encoded, png = cv2.imencode(".png", image)
    if not encoded or not numpy.array_equal(cv2.imdecode(png, cv2.IMREAD_COLOR), image):
        sys.exit("OpenCV's PNG round trip changed the image")
    print(f"ok: system numpy {numpy.__version__} ({os.path.dirname(numpy.__file__)}), apt's bottleneck "
          f"{bottleneck.__version__} and OpenCV {cv2.__version__} import and work in the venv")


if __name__ == "__main__":
    main()
